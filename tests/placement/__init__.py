"""Tests of the routing-aware EP placement planner."""
