"""``python -m train --config configs/NAME.py key=value ...``"""
import sys

from train.cli import main

sys.exit(main())
