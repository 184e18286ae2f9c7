"""Shared test fixtures: topology, processes, strongSwan, captures."""
