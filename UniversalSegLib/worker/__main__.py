"""``python -m UniversalSegLib.worker FOLDER``: the inference worker process (see :mod:`.server`)."""
import sys

from .server import main

sys.exit(main())
