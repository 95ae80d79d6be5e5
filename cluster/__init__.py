"""Bring-up, placement, load generation, fault injection and the ``rayledger`` command."""
