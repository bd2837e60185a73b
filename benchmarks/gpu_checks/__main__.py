import sys

from benchmarks.gpu_checks import main

sys.exit(main())
