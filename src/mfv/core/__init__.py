"""The low layer every stage shares: errors, atomic writes, keys, lazy exports."""
