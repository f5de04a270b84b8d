"""Integrations with other systems (verl, ...). They depend on ``agentenv.rollout`` and
``agentenv.envs``; nothing in those imports an integration."""
