"""The bundle: the contract between export time and run time. Imports nothing of el-export but `errors`."""
