#![no_std]
//! Empty library target: lets `viscum-user` name this crate as a
//! build-dependency so cargo rebuilds the loader when the classifier changes.
