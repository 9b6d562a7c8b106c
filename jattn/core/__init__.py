"""The math every impl is checked against: reference, online softmax, masks, block masks, checks."""
