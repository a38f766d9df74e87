import sys

from ascend_rl.cli.main import main

sys.exit(main())
