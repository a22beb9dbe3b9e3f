//! Configuration: the raw serde mirror of the JSON file and its validation into `Config`.
