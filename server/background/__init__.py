"""What a server process runs beside its requests: the lease reaper, the training worker and the
job wake-ups that end long polls."""
