"""Updates: where they come from (providers), what is trusted (the signed index, the
files' hashes), when they run (the checker, maintenance windows) and what is handed on.

    index       the update index (IncusOS's api/images format): parsed, selected, planned
    windows     maintenance windows: the clock is an input, never read here
    smime       the index's S/MIME signature, verified against the update CA
    fetch       HTTP(S): bounded small documents, resumable verified downloads, the proxy
    providers   images, local and operations-center behind one Protocol
    secureboot  Secure Boot KEK/db/dbx updates: planned, refused when they would revoke
                what boots, written through efivarfs
    checker     one check: Secure Boot certificates, applications, the OS, in that order;
                the state the API shows; the hand-off to the installers

Pure where it can be (index, windows, the Secure Boot plan); the edges (network, openssl,
efivarfs, the state file) are thin and named as such.
"""
