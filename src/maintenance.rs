//! Pure maintenance-window arithmetic in a time zone (DST-correct) and slot picking.
