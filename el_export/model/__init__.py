"""The math as torch modules: EL and standard attention, shared layers, positions, the models. No family code."""
