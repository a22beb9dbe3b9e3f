//! Plain domain types shared by the core and the edges.
