"""The `latfarm` command line: its commands, their output rules, the bench and demo commands, and
the helpers that run a server, worker or agent process on this machine."""
