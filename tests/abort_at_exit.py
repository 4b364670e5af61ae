"""``python -m opendino ARGS`` in a process whose interpreter teardown aborts (SIGABRT), as a library thread
that crashes at exit does (pytorch/pytorch#179291: gloo's worker threads outlive ``destroy_process_group``).
The torchrun tests launch their ranks through it: a finished multi-rank run must exit 0 without reaching
that teardown."""

import atexit
import os
import runpy

atexit.register(os.abort)
runpy.run_module("opendino", run_name="__main__")
