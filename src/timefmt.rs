//! Parsing and printing of durations, dates and instants in the formats the config and CLI use.
