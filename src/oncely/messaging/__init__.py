"""Message dedup: idempotent consumers, dedup windows, the transactional inbox and outbox."""
