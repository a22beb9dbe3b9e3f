//! Persisted state: versioned JSON, atomic replace with fsync, intents written first.
