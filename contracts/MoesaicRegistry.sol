// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title MoesaicRegistry
/// @notice The moesaic protocol's on-chain state for any EVM chain: the round schedule, tasks,
///         members (bonded miners and owner-authorised validators), miners' artifact
///         commitments, validators' weights and merged checkpoints, all keyed by round.
/// @dev The schedule is a pure function of the block number and must stay identical to
///      `protocol.round.schedule.position` in Python (a test compares them block by block). Phase
///      indices follow `protocol.round.schedule.PHASES`: train, commit, reveal, evaluate, weights,
///      merge.
///
///      Registration is PERMISSIONLESS WITH A REFUNDABLE BOND, not owner-approved:
///      - an incentivised network must let anyone compete without asking an operator, or the
///        owner becomes a gatekeeper who can censor miners and a bottleneck for onboarding;
///      - the bond (minimum set by the owner, returned on deregistration) makes each identity
///        cost locked capital, so Sybil swarms that flood commitments or the member table are
///        bounded by money rather than by trust (Bittensor uses a burn for the same reason);
///      - validators are the exception: their weights decide payouts, so the owner authorises
///        them explicitly (they need no bond and may also bond to mine).
///      Freed uids are reused (last freed, first reused), as Bittensor reuses uids, so the
///      member table stays bounded by the number of addresses bonded at once. Commitments
///      record the committing address beside its uid for that reason.
///
///      BOUNDED READS AND WRITES: no function's gas grows with the number of members,
///      commitments or checkpoints ever recorded. Lists are read in pages of at most
///      `MAX_PAGE` entries (`membersPage`, `commitmentsPage`; weight sets `MAX_WEIGHT_SETS_PAGE`
///      at a time, each of at most `MAX_WEIGHTS` uids), uris are at most `MAX_URI` bytes, and
///      a checkpoint is found by round (`checkpointOf`) or as the latest one before a round
///      (`latestCheckpointBefore`: one read for the running round, a binary search over the
///      published rounds for an older one). A list that any bonded key can lengthen (sybil
///      registrations, their commitments) or that grows with time (one checkpoint per round)
///      read in one call would pass a node's gas cap some day and stop every role at once.
///
///      WEIGHTS ARE COMMITTED, THEN REVEALED: a validator commits
///      `weightsHash(round, validator, uids, values, salt)` (keccak256 of their `abi.encode`)
///      in the round's evaluate phase and reveals the weights with the salt in the weights
///      phase; a reveal that does not match its own commitment reverts. While commitments are
///      open only hashes are on chain, so a validator cannot copy another's weights of the
///      round without evaluating, and the sender's address in the hash stops it from
///      committing another validator's hash as its own.
contract MoesaicRegistry {
    // ---------------------------------------------------------------- constants and types

    uint8 public constant TRAIN = 0;
    uint8 public constant COMMIT = 1;
    uint8 public constant REVEAL = 2;
    uint8 public constant EVALUATE = 3;
    uint8 public constant WEIGHTS = 4;
    uint8 public constant MERGE = 5;
    /// @notice `currentPhase` in `WrongPhase` when the first round has not started yet.
    uint8 public constant NO_PHASE = 255;
    /// @notice uids are uint16 (as on Bittensor), so at most 65536 slots.
    uint256 public constant MAX_MEMBERS = 65536;
    /// @notice Most entries one `membersPage` or `commitmentsPage` call returns.
    uint256 public constant MAX_PAGE = 256;
    /// @notice Most uids in one validator's weights.
    uint256 public constant MAX_WEIGHTS = 512;
    /// @notice Most weight sets one `weightsPage` call returns.
    uint256 public constant MAX_WEIGHT_SETS_PAGE = 4;
    /// @notice Longest task or checkpoint uri, in bytes.
    uint256 public constant MAX_URI = 1024;

    struct Member {
        address account; // zero: a free slot
        bool miner; // registered itself with a bond: may commit
        bool validator; // authorised by the owner: may set weights
        uint256 bond; // wei held for this member, returned on deregistration
    }

    struct MemberView {
        uint16 uid;
        address account;
        uint256 bond;
        bool miner;
        bool validator;
    }

    struct Task {
        bytes32 baseHash;
        bytes32 assignmentHash;
        bytes32 dataHash;
        string uri;
        uint64 blockNumber;
    }

    struct Commitment {
        address miner;
        uint16 uid;
        uint64 blockNumber;
        bytes32 digest;
    }

    struct WeightSet {
        uint16 validatorUid;
        address validator;
        uint64 blockNumber;
        uint16[] uids;
        uint16[] weights;
    }

    struct Checkpoint {
        uint256 round;
        bytes32 digest;
        string uri;
        bytes32 deltasDigest;
        uint64 blockNumber;
        address publisher;
    }

    // ---------------------------------------------------------------- errors

    error NotOwner(address caller);
    error ZeroAddress();
    error BadSchedule();
    /// @param currentRound 0 and currentPhase NO_PHASE before the first round starts.
    error WrongPhase(uint256 round, uint8 expected, uint256 currentRound, uint8 currentPhase);
    error NotRegistered(address account);
    error AlreadyRegistered(address account, uint16 uid);
    error InsufficientBond(uint256 sent, uint256 required);
    error RegistryFull();
    error TransferFailed(address to, uint256 amount);
    error NotValidator(address account);
    error NotMerger(address account);
    error AlreadyCommitted(uint256 round, address miner);
    error BadLengths(uint256 uids, uint256 weights);
    error InvalidUid(uint16 uid);
    error DuplicateUid(uint16 uid);
    error AlreadySetWeights(uint256 round, address validator);
    error AlreadyPublished(uint256 round);
    error NoTask();
    error UnknownTask(uint256 taskId);
    error UnknownPhase(uint8 phase);
    error PageTooLarge(uint256 count, uint256 max);
    error TooManyWeights(uint256 count, uint256 max);
    error UriTooLong(uint256 length, uint256 max);
    error EmptyWeightCommitment();
    error AlreadyCommittedWeights(uint256 round, address validator);
    error NoWeightCommitment(uint256 round, address validator);
    error WeightsMismatch(uint256 round, address validator);

    // ---------------------------------------------------------------- events

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    event MinBondSet(uint256 minBond);
    event Registered(uint16 indexed uid, address indexed account, uint256 bond);
    event Deregistered(uint16 indexed uid, address indexed account, uint256 refund);
    event ValidatorSet(uint16 indexed uid, address indexed account, bool allowed);
    event MergerSet(address indexed account, bool allowed);
    event TaskPublished(
        uint256 indexed taskId, bytes32 baseHash, bytes32 assignmentHash, bytes32 dataHash, string uri
    );
    event Committed(uint256 indexed round, uint16 indexed uid, address indexed miner, bytes32 digest);
    event WeightsCommitted(
        uint256 indexed round, uint16 indexed validatorUid, address indexed validator, bytes32 commitHash
    );
    event WeightsSet(
        uint256 indexed round,
        uint16 indexed validatorUid,
        address indexed validator,
        uint16[] uids,
        uint16[] weights
    );
    event CheckpointPublished(
        uint256 indexed round, bytes32 digest, string uri, bytes32 deltasDigest, address indexed publisher
    );

    // ---------------------------------------------------------------- state

    address public owner;
    uint256 public minBond;

    uint256 public immutable startBlock;
    uint256 public immutable roundLength;
    uint256 private immutable _train;
    uint256 private immutable _commit;
    uint256 private immutable _reveal;
    uint256 private immutable _evaluate;
    uint256 private immutable _weights;
    uint256 private immutable _merge;

    Member[] private _members; // index = uid
    uint16[] private _freeUids;
    mapping(address => uint256) private _uidPlusOne; // 0: not a member
    mapping(address => bool) public isMerger;

    Task[] private _tasks;
    mapping(uint256 => Commitment[]) private _commitments;
    mapping(uint256 => mapping(address => bool)) private _committed;
    mapping(uint256 => WeightSet[]) private _weightSets;
    mapping(uint256 => mapping(address => bool)) private _weighted;
    mapping(uint256 => mapping(address => bytes32)) private _weightCommitments;
    mapping(uint256 => Checkpoint) private _checkpointOf; // blockNumber 0: none for that round
    uint256[] private _publishedRounds; // ascending: a round publishes only in its merge phase

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    /// @param lengths Blocks per phase in PHASES order: train, commit, reveal, evaluate,
    ///        weights, merge; each at least 1.
    /// @param minBond_ Minimum wei a miner bonds to register (0 allowed, e.g. on a devnet).
    constructor(uint256 startBlock_, uint256[6] memory lengths, uint256 minBond_) {
        for (uint256 i = 0; i < 6; i++) {
            if (lengths[i] == 0) revert BadSchedule();
        }
        startBlock = startBlock_;
        _train = lengths[0];
        _commit = lengths[1];
        _reveal = lengths[2];
        _evaluate = lengths[3];
        _weights = lengths[4];
        _merge = lengths[5];
        roundLength = lengths[0] + lengths[1] + lengths[2] + lengths[3] + lengths[4] + lengths[5];
        owner = msg.sender;
        minBond = minBond_;
        emit OwnershipTransferred(address(0), msg.sender);
        emit MinBondSet(minBond_);
    }

    // ---------------------------------------------------------------- schedule

    /// @notice The schedule as deployed: first block of round 0 and the six phase lengths.
    function schedule() external view returns (uint256 start, uint256[6] memory lengths) {
        return (startBlock, _lengths());
    }

    /// @notice Round and phase of block `blk`, exactly as `protocol.round.schedule.position`.
    /// @return started False before `startBlock` (every other field is then zero).
    /// @return round Round number, 0 for the round starting at `startBlock`.
    /// @return phase Phase index in PHASES order.
    /// @return phaseStart First block of the phase.
    /// @return phaseEnd Last block of the phase, inclusive.
    function position(uint256 blk)
        public
        view
        returns (bool started, uint256 round, uint8 phase, uint256 phaseStart, uint256 phaseEnd)
    {
        if (blk < startBlock) return (false, 0, 0, 0, 0);
        round = (blk - startBlock) / roundLength;
        uint256 roundStart = startBlock + round * roundLength;
        uint256 offset = blk - roundStart;
        uint256[6] memory lengths = _lengths();
        uint256 acc = 0;
        for (uint8 i = 0; i < 6; i++) {
            if (offset < acc + lengths[i]) {
                return (true, round, i, roundStart + acc, roundStart + acc + lengths[i] - 1);
            }
            acc += lengths[i];
        }
        assert(false); // unreachable: offset < roundLength
    }

    /// @notice First and last block (inclusive) of `phase` in `round`.
    function phaseBounds(uint256 round, uint8 phase) public view returns (uint256 first, uint256 last) {
        if (phase > MERGE) revert UnknownPhase(phase);
        uint256[6] memory lengths = _lengths();
        first = startBlock + round * roundLength;
        for (uint8 i = 0; i < phase; i++) {
            first += lengths[i];
        }
        last = first + lengths[phase] - 1;
    }

    function _lengths() private view returns (uint256[6] memory) {
        return [_train, _commit, _reveal, _evaluate, _weights, _merge];
    }

    /// @dev Reverts unless the current block lies in `phase` of `round`.
    function _requirePhase(uint256 round, uint8 phase) private view {
        (bool started, uint256 r, uint8 p,,) = position(block.number);
        if (!started) revert WrongPhase(round, phase, 0, NO_PHASE);
        if (r != round || p != phase) revert WrongPhase(round, phase, r, p);
    }

    // ---------------------------------------------------------------- ownership and roles

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    /// @notice Minimum bond for future registrations; existing bonds are unchanged.
    function setMinBond(uint256 minBond_) external onlyOwner {
        minBond = minBond_;
        emit MinBondSet(minBond_);
    }

    /// @notice Authorise (or withdraw) `account` as a validator. An authorised address that is
    ///         not yet a member gets a uid; withdrawing frees it unless the member also bonded.
    function setValidator(address account, bool allowed) external onlyOwner {
        if (account == address(0)) revert ZeroAddress();
        uint256 slot = _uidPlusOne[account];
        if (allowed) {
            uint16 uid = slot == 0 ? _allocate(account) : uint16(slot - 1);
            _members[uid].validator = true;
            emit ValidatorSet(uid, account, true);
            return;
        }
        if (slot == 0 || !_members[slot - 1].validator) revert NotValidator(account);
        Member storage m = _members[slot - 1];
        m.validator = false;
        emit ValidatorSet(uint16(slot - 1), account, false);
        if (!m.miner) _free(uint16(slot - 1));
    }

    /// @notice Allow (or stop) `account` to publish merged checkpoints beside the owner.
    function setMerger(address account, bool allowed) external onlyOwner {
        if (account == address(0)) revert ZeroAddress();
        isMerger[account] = allowed;
        emit MergerSet(account, allowed);
    }

    // ---------------------------------------------------------------- members

    /// @notice Register the sender as a miner, bonding `msg.value` (at least `minBond`).
    function register() external payable returns (uint16 uid) {
        uint256 slot = _uidPlusOne[msg.sender];
        if (slot != 0 && _members[slot - 1].miner) {
            revert AlreadyRegistered(msg.sender, uint16(slot - 1));
        }
        if (msg.value < minBond) revert InsufficientBond(msg.value, minBond);
        uid = slot == 0 ? _allocate(msg.sender) : uint16(slot - 1);
        Member storage m = _members[uid];
        m.miner = true;
        m.bond = msg.value;
        emit Registered(uid, msg.sender, msg.value);
    }

    /// @notice Leave as a miner and get the bond back. A validator keeps its uid.
    function deregister() external {
        uint256 slot = _uidPlusOne[msg.sender];
        if (slot == 0 || !_members[slot - 1].miner) revert NotRegistered(msg.sender);
        uint16 uid = uint16(slot - 1);
        Member storage m = _members[uid];
        uint256 refund = m.bond;
        // Effects before the transfer, so a re-entrant call sees the member already gone.
        m.bond = 0;
        m.miner = false;
        if (!m.validator) _free(uid);
        emit Deregistered(uid, msg.sender, refund);
        if (refund > 0) {
            (bool ok,) = payable(msg.sender).call{value: refund}("");
            if (!ok) revert TransferFailed(msg.sender, refund);
        }
    }

    function _allocate(address account) private returns (uint16 uid) {
        if (_freeUids.length > 0) {
            uid = _freeUids[_freeUids.length - 1];
            _freeUids.pop();
            _members[uid] = Member(account, false, false, 0);
        } else {
            if (_members.length >= MAX_MEMBERS) revert RegistryFull();
            uid = uint16(_members.length);
            _members.push(Member(account, false, false, 0));
        }
        _uidPlusOne[account] = uint256(uid) + 1;
    }

    function _free(uint16 uid) private {
        delete _uidPlusOne[_members[uid].account];
        delete _members[uid];
        _freeUids.push(uid);
    }

    /// @notice Number of uid slots, free ones included: `membersPage` reads [0, memberCount()).
    function memberCount() external view returns (uint256) {
        return _members.length;
    }

    /// @notice The occupied slots among uids [start, start + count), in uid order.
    /// @dev At most MAX_PAGE slots per call, so the gas of a call is bounded whatever the
    ///      number of members; a reader pages through memberCount() slots.
    function membersPage(uint256 start, uint256 count) external view returns (MemberView[] memory out) {
        if (count > MAX_PAGE) revert PageTooLarge(count, MAX_PAGE);
        uint256 end = _pageEnd(start, count, _members.length);
        uint256 n = 0;
        for (uint256 i = start; i < end; i++) {
            if (_members[i].account != address(0)) n++;
        }
        out = new MemberView[](n);
        uint256 j = 0;
        for (uint256 i = start; i < end; i++) {
            Member storage m = _members[i];
            if (m.account == address(0)) continue;
            out[j++] = MemberView(uint16(i), m.account, m.bond, m.miner, m.validator);
        }
    }

    /// @dev The end (exclusive) of a page of `count` from `start` in a list of `length`.
    function _pageEnd(uint256 start, uint256 count, uint256 length) private pure returns (uint256) {
        if (start >= length) return start;
        return length - start < count ? length : start + count;
    }

    /// @notice (true, uid) for a member, (false, 0) otherwise.
    function uidOf(address account) external view returns (bool found, uint16 uid) {
        uint256 slot = _uidPlusOne[account];
        return (slot != 0, slot == 0 ? 0 : uint16(slot - 1));
    }

    // ---------------------------------------------------------------- tasks

    /// @notice Publish the task that rounds from now on refer to; returns its id (0, 1, ...).
    function publishTask(bytes32 baseHash, bytes32 assignmentHash, bytes32 dataHash, string calldata uri)
        external
        onlyOwner
        returns (uint256 taskId)
    {
        _checkUri(uri);
        taskId = _tasks.length;
        _tasks.push(Task(baseHash, assignmentHash, dataHash, uri, uint64(block.number)));
        emit TaskPublished(taskId, baseHash, assignmentHash, dataHash, uri);
    }

    function taskCount() external view returns (uint256) {
        return _tasks.length;
    }

    function taskAt(uint256 taskId) public view returns (Task memory) {
        if (taskId >= _tasks.length) revert UnknownTask(taskId);
        return _tasks[taskId];
    }

    /// @notice The latest published task and its id; reverts `NoTask` before the first.
    function currentTask() external view returns (uint256 taskId, Task memory task) {
        if (_tasks.length == 0) revert NoTask();
        taskId = _tasks.length - 1;
        task = _tasks[taskId];
    }

    // ---------------------------------------------------------------- commitments

    /// @notice Record the sender's artifact digest for `round`, once, during its commit phase.
    function commit(uint256 round, bytes32 digest) external {
        uint256 slot = _uidPlusOne[msg.sender];
        if (slot == 0 || !_members[slot - 1].miner) revert NotRegistered(msg.sender);
        _requirePhase(round, COMMIT);
        if (_committed[round][msg.sender]) revert AlreadyCommitted(round, msg.sender);
        _committed[round][msg.sender] = true;
        uint16 uid = uint16(slot - 1);
        _commitments[round].push(Commitment(msg.sender, uid, uint64(block.number), digest));
        emit Committed(round, uid, msg.sender, digest);
    }

    /// @notice Commitments [start, start + count) of `round` in the order they landed, at
    ///         most MAX_PAGE per call; `commitmentCount(round)` says how many there are.
    function commitmentsPage(uint256 round, uint256 start, uint256 count)
        external
        view
        returns (Commitment[] memory out)
    {
        if (count > MAX_PAGE) revert PageTooLarge(count, MAX_PAGE);
        Commitment[] storage all = _commitments[round];
        uint256 end = _pageEnd(start, count, all.length);
        out = new Commitment[](end - start);
        for (uint256 i = start; i < end; i++) {
            out[i - start] = all[i];
        }
    }

    function commitmentCount(uint256 round) external view returns (uint256) {
        return _commitments[round].length;
    }

    // ---------------------------------------------------------------- weights

    /// @notice The hash a validator commits for its weights: keccak256 of
    ///         abi.encode(round, validator, uids, values, salt).
    function weightsHash(
        uint256 round,
        address validator,
        uint16[] calldata uids,
        uint16[] calldata values,
        bytes32 salt
    ) public pure returns (bytes32) {
        return keccak256(abi.encode(round, validator, uids, values, salt));
    }

    /// @notice Commit the sender's weights for `round` (their `weightsHash`), once, during
    ///         the round's evaluate phase.
    function commitWeights(uint256 round, bytes32 commitHash) external {
        uint256 slot = _uidPlusOne[msg.sender];
        if (slot == 0 || !_members[slot - 1].validator) revert NotValidator(msg.sender);
        _requirePhase(round, EVALUATE);
        if (commitHash == bytes32(0)) revert EmptyWeightCommitment();
        if (_weightCommitments[round][msg.sender] != bytes32(0)) {
            revert AlreadyCommittedWeights(round, msg.sender);
        }
        _weightCommitments[round][msg.sender] = commitHash;
        emit WeightsCommitted(round, uint16(slot - 1), msg.sender, commitHash);
    }

    /// @notice The weights hash `validator` committed for `round` (zero: none).
    function weightCommitment(uint256 round, address validator) external view returns (bytes32) {
        return _weightCommitments[round][validator];
    }

    /// @notice Reveal the sender's weights for `round` during its weights phase; they must
    ///         match the sender's own commitment of the round's evaluate phase.
    /// @dev Once per validator per round, no overwrite: a round's weights are a final verdict
    ///      that payouts and the merge read, so they must not change under a reader, and a
    ///      validator cannot revise its vote after seeing the others'. uids must be occupied
    ///      and unique; weights are the u16 max-upscaled encoding (`u16_weights` in Python).
    function setWeights(uint256 round, uint16[] calldata uids, uint16[] calldata values, bytes32 salt)
        external
    {
        uint256 slot = _uidPlusOne[msg.sender];
        if (slot == 0 || !_members[slot - 1].validator) revert NotValidator(msg.sender);
        _requirePhase(round, WEIGHTS);
        if (uids.length != values.length) revert BadLengths(uids.length, values.length);
        if (uids.length > MAX_WEIGHTS) revert TooManyWeights(uids.length, MAX_WEIGHTS);
        if (_weighted[round][msg.sender]) revert AlreadySetWeights(round, msg.sender);
        bytes32 committed = _weightCommitments[round][msg.sender];
        if (committed == bytes32(0)) revert NoWeightCommitment(round, msg.sender);
        if (weightsHash(round, msg.sender, uids, values, salt) != committed) {
            revert WeightsMismatch(round, msg.sender);
        }
        _checkUids(uids);
        _weighted[round][msg.sender] = true;
        uint16 vuid = uint16(slot - 1);
        _weightSets[round].push(WeightSet(vuid, msg.sender, uint64(block.number), uids, values));
        emit WeightsSet(round, vuid, msg.sender, uids, values);
    }

    /// @dev A bitmap over uid slots finds duplicates in one pass; its size is bounded by
    ///      MAX_MEMBERS (257 words at most).
    function _checkUids(uint16[] calldata uids) private view {
        uint256[] memory seen = new uint256[](_members.length / 256 + 1);
        for (uint256 i = 0; i < uids.length; i++) {
            uint16 uid = uids[i];
            if (uid >= _members.length || _members[uid].account == address(0)) revert InvalidUid(uid);
            uint256 bit = uint256(1) << (uid % 256);
            if (seen[uid / 256] & bit != 0) revert DuplicateUid(uid);
            seen[uid / 256] |= bit;
        }
    }

    /// @notice How many validators set weights for `round`.
    function weightSetCount(uint256 round) external view returns (uint256) {
        return _weightSets[round].length;
    }

    /// @notice Weight sets [start, start + count) of `round` in the order they landed, at most
    ///         MAX_WEIGHT_SETS_PAGE per call.
    function weightsPage(uint256 round, uint256 start, uint256 count)
        external
        view
        returns (WeightSet[] memory out)
    {
        if (count > MAX_WEIGHT_SETS_PAGE) revert PageTooLarge(count, MAX_WEIGHT_SETS_PAGE);
        WeightSet[] storage all = _weightSets[round];
        uint256 end = _pageEnd(start, count, all.length);
        out = new WeightSet[](end - start);
        for (uint256 i = start; i < end; i++) {
            out[i - start] = all[i];
        }
    }

    // ---------------------------------------------------------------- checkpoints

    /// @notice Record the merged checkpoint of `round`, once, during its merge phase, by the
    ///         owner or an authorised merger.
    /// @dev Only in the round's own merge phase, never later: round r + 1 builds on the latest
    ///      checkpoint before it, so a checkpoint of round r landing once round r + 1 has
    ///      started would change the base of a running round (every miner that trained on
    ///      the previous one would be `wrong_base`). It also keeps `_publishedRounds` sorted.
    function publishCheckpoint(uint256 round, bytes32 digest, string calldata uri, bytes32 deltasDigest)
        external
    {
        if (msg.sender != owner && !isMerger[msg.sender]) revert NotMerger(msg.sender);
        _requirePhase(round, MERGE);
        _checkUri(uri);
        if (_checkpointOf[round].blockNumber != 0) revert AlreadyPublished(round);
        _checkpointOf[round] = Checkpoint(round, digest, uri, deltasDigest, uint64(block.number), msg.sender);
        _publishedRounds.push(round);
        emit CheckpointPublished(round, digest, uri, deltasDigest, msg.sender);
    }

    /// @notice The checkpoint published for `round`, if any.
    function checkpointOf(uint256 round) external view returns (bool found, Checkpoint memory checkpoint) {
        checkpoint = _checkpointOf[round];
        found = checkpoint.blockNumber != 0;
    }

    /// @notice The checkpoint of the latest round before `round` that has one, if any: the
    ///         base round `round` builds on.
    /// @dev One read when every published round is before `round` (the running round's case);
    ///      otherwise a binary search over the published rounds, O(log n).
    function latestCheckpointBefore(uint256 round)
        public
        view
        returns (bool found, Checkpoint memory checkpoint)
    {
        uint256 n = _publishedRounds.length;
        if (n == 0 || _publishedRounds[0] >= round) return (false, checkpoint);
        uint256 lo = 0; // _publishedRounds[lo] < round
        uint256 hi = n; // _publishedRounds[hi] >= round, or hi == n
        if (_publishedRounds[n - 1] >= round) {
            while (hi - lo > 1) {
                uint256 mid = (lo + hi) / 2;
                if (_publishedRounds[mid] < round) lo = mid;
                else hi = mid;
            }
        } else {
            lo = n - 1;
        }
        return (true, _checkpointOf[_publishedRounds[lo]]);
    }

    /// @notice The latest published checkpoint, if any.
    function latestCheckpoint() external view returns (bool found, Checkpoint memory checkpoint) {
        return latestCheckpointBefore(type(uint256).max);
    }

    function checkpointCount() external view returns (uint256) {
        return _publishedRounds.length;
    }

    function _checkUri(string calldata uri) private pure {
        if (bytes(uri).length > MAX_URI) revert UriTooLong(bytes(uri).length, MAX_URI);
    }
}
