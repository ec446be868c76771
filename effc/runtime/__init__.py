"""From a kernel plan to a PyTorch-callable op; and the oracle derived from the same spec."""
