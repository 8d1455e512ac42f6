//! Test harness for Shoal: boots real nodes in-process and drives them over real TCP/TLS.
