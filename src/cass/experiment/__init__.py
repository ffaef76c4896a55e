"""The comparison protocol of SPEC §2: configuration, planning, running and results of ``cass experiment``."""
