//! The UDP half of the data path: the NAT's behaviour ([`nat`], pure
//! logic), the LRU table of mappings and reply sockets ([`table`], pure
//! logic), how received buffers become GSO sends ([`batch`], pure logic),
//! and the worker that moves datagrams ([`worker`]).

pub mod batch;
pub mod nat;
pub mod table;
pub mod worker;
