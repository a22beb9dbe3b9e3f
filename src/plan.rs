//! Pure planning: (config, observed world, persisted state, now) -> plan.
