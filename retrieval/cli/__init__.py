"""The ``retrieval`` command line. Stage packages are imported inside each command, never at import time."""
