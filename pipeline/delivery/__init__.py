"""Delivery: plan, sending policy, shaping, routing, signing, compose and send."""
