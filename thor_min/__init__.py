"""thor-min: a minimal, from-scratch implementation of THOR (arXiv 2509.13761).

Tool-integrated reasoning for math: a language model reasons in text, writes python cells
mid-generation, reads their real output, and is trained by TIRGen (actor-critic SFT data),
cold-start SFT and hierarchical RL (trajectory-level GRPO plus a step-level loss on failed
code steps). Each idea lives in one flat module; start with README.md for the map.
"""

__version__ = "0.1.0"
