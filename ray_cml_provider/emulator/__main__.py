import sys

from ray_cml_provider.emulator.main import main

sys.exit(main())
