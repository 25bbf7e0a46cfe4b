"""First-party backend plugins, registered through the ``failover_supervisor.backends`` entry
point group exactly as a third-party package would register its own."""
