// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title NeuronPrecompileStandIn
/// @notice TEST ONLY. Stands in for the Bittensor EVM neuron precompile at
///         0x0000000000000000000000000000000000000804 on a local EVM (placed with
///         `anvil_setCode`), so the `subtensor-evm` backend's calls can be checked for their
///         exact ABI encoding. It records what it receives and mirrors a few of subtensor's
///         checks (equal lengths, unique uids, a weights rate limit); it does not emulate the
///         chain. The function signatures follow the precompile's published ABI.
contract NeuronPrecompileStandIn {
    error WeightVecNotEqualSize(uint256 uids, uint256 weights);
    error DuplicateUids(uint16 uid);
    error SettingWeightsTooFast(uint256 lastBlock, uint256 currentBlock);

    event WeightsSet(address indexed caller, uint16 netuid, uint16[] dests, uint16[] weights, uint64 versionKey);
    event WeightsCommitted(address indexed caller, uint16 netuid, bytes32 commitHash);

    /// @notice blocks between two weight settings of one caller (subtensor: WeightsSetRateLimit)
    uint256 public constant RATE_LIMIT = 2;

    mapping(address => uint256) public lastSet;
    mapping(address => uint16[]) private lastDests;
    mapping(address => uint16[]) private lastWeights;
    mapping(address => bytes32) public lastCommit;

    function setWeights(uint16 netuid, uint16[] calldata dests, uint16[] calldata weights, uint64 versionKey)
        external
        payable
    {
        if (dests.length != weights.length) revert WeightVecNotEqualSize(dests.length, weights.length);
        for (uint256 i = 0; i < dests.length; i++) {
            for (uint256 j = 0; j < i; j++) {
                if (dests[i] == dests[j]) revert DuplicateUids(dests[i]);
            }
        }
        uint256 last = lastSet[msg.sender];
        if (last != 0 && block.number < last + RATE_LIMIT) revert SettingWeightsTooFast(last, block.number);
        lastSet[msg.sender] = block.number;
        lastDests[msg.sender] = dests;
        lastWeights[msg.sender] = weights;
        emit WeightsSet(msg.sender, netuid, dests, weights, versionKey);
    }

    function commitWeights(uint16 netuid, bytes32 commitHash) external payable {
        lastCommit[msg.sender] = commitHash;
        emit WeightsCommitted(msg.sender, netuid, commitHash);
    }

    /// @notice what `caller` last set (test inspection; not part of the precompile)
    function weightsOf(address caller) external view returns (uint16[] memory, uint16[] memory) {
        return (lastDests[caller], lastWeights[caller]);
    }
}
