"""The static sparse-pattern family: each method is a mask function plus a ``BlockMask`` builder on the
one block-sparse kernel (``jattn.block_sparse_attention``), or, for neighborhood attention, the tiled
``jattn.neighborhood_attention``. One file per paper; import the modules directly."""
