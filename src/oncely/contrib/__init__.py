"""Integrations that plug oncely into other systems in their own terms (Django apps, …)."""
