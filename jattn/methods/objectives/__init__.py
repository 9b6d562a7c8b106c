"""Attention training objectives: losses, regularisers and masking or matching rules that change what attention is
trained toward (issue 17). Each module is one paper; import from the module itself."""
