"""The KV-cache and decode family: methods that change what is cached or how a few new tokens attend to it,
on the one decode kernel (``jattn.decode_attention``). One file per paper; the entry points the catalogue
lists are re-exported here.
"""
from jattn.methods.kv import duplex
from jattn.methods.kv.duplex import DecodeCost, decode_cost
