"""`python -m ft_desk.trainer.cli`: the same commands as `ft-desk COMMAND`."""

import sys

from ft_desk.trainer.cli.main import main

sys.exit(main())
