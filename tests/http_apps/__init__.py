"""Applications the HTTP tests run behind oncely's middleware (in process and in servers)."""
