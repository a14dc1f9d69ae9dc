//! CloudPayments (written next).
