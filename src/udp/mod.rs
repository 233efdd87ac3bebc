//! The UDP half of the data path: the NAT session table ([`table`], pure
//! logic) and the worker that moves datagrams ([`worker`]).

pub mod table;
pub mod worker;
