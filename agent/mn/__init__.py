"""The mobile node agent."""
