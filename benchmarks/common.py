"""What every benchmark records next to its figures, and how it writes them."""

import json
import os
import platform
import sys
import time

import keras


def machine():
    """Where and when a figure was measured: date, command, CPUs, load."""
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=" ".join(["python", *sys.argv]),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
        backend=keras.config.backend(),
        keras=keras.__version__,
    )


def write_result(result, out=None):
    """Print `result` as JSON, and write it to the file `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
