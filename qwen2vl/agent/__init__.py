"""The visual agent: function calls (calls.py), environments to act in, and the loop that runs them."""
