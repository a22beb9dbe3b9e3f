//! Pure deletion lifecycle: stage dates and the stage machine.
