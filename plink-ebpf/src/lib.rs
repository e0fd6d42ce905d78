#![no_std]
// Exists so plink-ctl can name this crate as a build dependency (cargo needs a
// library target); the programs are in the `plink` binary target.
