"""Training for jattn models: loops, data, synthetic tasks, configs, distillation and the demo.

``python -m train --config configs/NAME.py key=value ...``
"""
