"""Analysis and cost models: analytic models of attention's cost and structure, checked against runs.

One file per paper; the entry points are re-exported here. (P22's Op/B decode model lives with the decode
family, ``jattn.methods.kv.duplex``; P08's eFLOPs model with its selector, ``jattn.methods.dynamic.kinetics``.)
"""
from jattn.methods.analysis import fusemax
from jattn.methods.analysis.fusemax import CascadeCost, cascade_attention, cascade_cost_model
