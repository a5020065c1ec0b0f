"""The base library every stage shares: files, configs, weights, run layout, training, optimiser.

Nothing here knows about a particular model: stage one (`tokenizer`), CLIP and stage two
(`generator`) build on it, and it imports neither of them.
"""
