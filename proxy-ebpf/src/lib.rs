#![no_std]
// This file exists so the crate has a library target: proxy-userspace lists
// it as a build-dependency, which lets cargo rebuild the embedded object when
// the programs change (as aya-template does).
