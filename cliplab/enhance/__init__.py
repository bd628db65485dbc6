"""CLIP-guided image enhancement: a small enhancer with a differentiable path into the image tower
(:mod:`cliplab.enhance.enhancer`) and RAVE's residual-vector guidance (:mod:`cliplab.enhance.rave`)."""
