"""Ray: started or joined the way the cluster is set up, jobs submitted to it, and the one module of Ray's
and Python's private details."""
